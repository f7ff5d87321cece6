"""How the bundled model (pipeline/models/shapes-tiny-sd) was made: the training script
(``python -m benchmarks.training.train``), its token grounding losses and the weight averaging
(``python -m benchmarks.training.average``). Not part of the installed package; the model card
says which commands made the bundled weights."""
