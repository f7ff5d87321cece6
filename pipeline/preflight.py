"""Pre-flight: what ``synthgen run`` would reject, found before any weights load, Ray starts or a file is written.

``load_spec(..., check_files=True)`` calls :func:`check_model` through ``spec.check_paths``, so
``validate``, ``run``, ``eval`` and ``repair`` run the same checks; ``submit`` runs them when the
model folder is on this machine. ``validate`` also runs :func:`check_output_dir` (``run`` leaves
that to the writer, which checks ownership and fingerprint in full before Ray starts).

Checks of a local model folder, from its JSON files, its tokenizer vocabulary and directory listings:

* ``model_index.json`` is readable and names a supported family (stages/families/: ``_class_name``
  checked against the denoiser's config; ``model.family`` may name it and must not contradict it);
* the family's components are listed and present, and each one with weights holds plain
  ``*.safetensors`` (the loader reads nothing else);
* every tokenizer of the family loads (``tokenizer``; SDXL also ``tokenizer_2``); in each, every class
  name, synonym and attribute is at least one token and no unknown one, and the longest prompt the
  sampler can build (:func:`longest_prompts`) fits the family's limit for it (CLIP: 77); with counts
  asked in words (``prompts.count_style: number``), the number words are words the tokenizer knows;
* ``masks.capture_resolutions`` / ``self_attention_resolution`` name attention levels the model has
  at the job's image size, by the family's own rule (``capture_plan``; UNets: ``stages/unet_layout.py``),
  and self-attention fits.

A hub id is not checked here: its files are remote, only the workers download them, and the loader
reports what is wrong there; but with ``HF_HUB_OFFLINE`` set, a hub id missing from the local Hugging
Face cache is refused at once (the run could only fail after starting). Every failure is a SpecError, one line: ``<job file>: <field>: <reason
and fix>``.

Must not: load weights, import torch, diffusers or Ray (transformers' tokenizer needs none), or write.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from stages.families import AUTO, FamilyError, all_families, family_class, resolve_family
from stages.families.base import ModelFamily
from stages.families.mmdit import MMDiTFamily
from stages.prompt_words import count_phrase, count_words

from .spec import JobSpec, SpecError, UsageError

OBJECTS = "{objects}"  # the sampler's placeholder (stages/sampling.py)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")
CONVERT = ("convert the folder with diffusers: DiffusionPipeline.from_pretrained(folder).save_pretrained(new_folder, "
           "safe_serialization=True)")


def _short(text: str, limit: int = 40) -> str:
    """repr of ``text``, cut to ``limit`` characters (long class words stay one readable line)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _read_json(path: Path, source: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{source}: model.path: {path} is missing; expected a diffusers Stable Diffusion folder "
                        "(save_pretrained layout)") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"{source}: model.path: {path} is not readable JSON ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); restore it from the model's source") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: model.path: {path} holds a JSON {type(data).__name__}, not an object; restore it "
                        "from the model's source")
    return data


def model_folder(spec: JobSpec) -> Path | None:
    """The job's local model folder (an absolute ``model.path``: load_spec resolves local paths); None for a hub id."""
    path = Path(spec.model.path)
    return path if path.is_absolute() else None


def hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds the hub model's ``model_index.json`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except ValueError:  # not a valid repo id: the loader says so
        return False


def check_hub_offline(repo_id: str, source: str) -> None:
    """With ``HF_HUB_OFFLINE`` set, a hub model must be in the local cache."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") and not hub_cached(repo_id):
        raise SpecError(f"{source}: model.path: hub model {repo_id} is not in the local Hugging Face cache and "
                        f"HF_HUB_OFFLINE is set; download it first (`hf download {repo_id}`) or give a local folder")


HUB_PROBE_TIMEOUT_S = 10.0


def check_hub_reachable(repo_id: str) -> None:
    """Before a run whose hub model is not in the local cache: the hub answers for it (one request, at most
    :data:`HUB_PROBE_TIMEOUT_S`), else UsageError. Without this the synthesis workers retry the download
    for minutes after the run has started."""
    if hub_cached(repo_id) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise UsageError(f"model.path: hub model {repo_id} is gated; accept its licence on the hub and log in "
                         "(`hf auth login`), or give a local folder") from None
    except RepositoryNotFoundError:
        raise UsageError(f"model.path: {repo_id} is not a local folder and the Hugging Face hub has no such model "
                         "(or it is private: `hf auth login`); check the id or give a local folder") from None
    except Exception as e:  # connection refused, DNS, timeout, proxy: the workers would retry for minutes
        raise UsageError(f"model.path: hub model {repo_id} is not in the local Hugging Face cache and the hub "
                         f"cannot be reached ({type(e).__name__}: {' '.join(str(e).split())[:80]}); download it first "
                         f"(`hf download {repo_id}`), give a local folder, or check the network / HF_ENDPOINT"
                         ) from None


def check_model(spec: JobSpec, source: str) -> None:
    """Every model-folder check (module docstring); nothing for a hub id."""
    folder = model_folder(spec)
    if folder is None:
        check_hub_offline(spec.model.path, source)
        family = job_family(spec)
        check_guidance_cutoff(spec, family, source)
        check_cache_interval(spec, family, source)
        check_excite(spec, family, source)
        check_early_check(spec, family, None, source)
        return
    if not folder.is_dir():
        given = spec.given("model.path") or ""
        here = Path(given).expanduser()
        hint = (f"; {given} exists relative to the current directory, but a relative path in a job file resolves "
                f"against the job file's folder: write it relative to that folder, or absolute"
                if given and not here.is_absolute() and here.is_dir() and here.resolve() != folder else "")
        raise SpecError(f"{source}: model.path: local model folder {folder} does not exist ({spec.origin('model.path')}; "
                        f"a hub id looks like 'org/name'){hint}")
    if not (folder / "model_index.json").is_file():
        raise SpecError(f"{source}: model.path: {folder} has no model_index.json; expected a diffusers Stable "
                        "Diffusion folder (save_pretrained layout)")
    family = check_layout(folder, source, getattr(spec.model, "family", "auto"))
    check_guidance_cutoff(spec, family, source)
    check_cache_interval(spec, family, source)
    check_excite(spec, family, source)
    check_early_check(spec, family, folder, source)
    check_inpainting_model(spec, folder, family, source)
    index = _read_json(folder / "model_index.json", source)
    schedulers = getattr(family, "schedulers", None)
    if schedulers is not None and spec.generation.scheduler not in schedulers:
        raise SpecError(f"{source}: generation.scheduler: {spec.generation.scheduler!r} does not fit a {family.title} "
                        f"model; use {' or '.join(repr(s) for s in schedulers)}")
    for name in family.tokenizers:
        if name in family.optional and index.get(name) in ([None, None], None):
            continue  # an optional tokenizer the folder leaves out (SD3 without T5)
        tokenizer = load_tokenizer(folder / name, source)
        limit = family.token_limit(name, tokenizer.model_max_length)
        if limit != tokenizer.model_max_length:
            tokenizer = Tokenizer(tokenizer.encode, tokenizer.unk_token, tokenizer.unk_token_id, limit)
        check_words(spec, tokenizer, source, name)
        check_count_words(spec, tokenizer, source, name)
        check_prompt_length(spec, tokenizer, source, name)
    check_capture(spec, folder, family, source)


def check_guidance_cutoff(spec: JobSpec, family: type[ModelFamily] | None, source: str) -> None:
    """``generation.guidance_cutoff`` needs a CFG batch the step-end callback can cut: refused on Flux
    (guidance-distilled) and on SD3 with references (its img2img pipelines withhold ``pooled_prompt_embeds``)."""
    if family is None or getattr(spec.generation, "guidance_cutoff", None) is None:
        return
    problem = family.guidance_cutoff_problem(image_guided=getattr(spec, "references", None) is not None)
    if problem:
        raise SpecError(f"{source}: generation.guidance_cutoff: {problem}")


def check_cache_interval(spec: JobSpec, family: type[ModelFamily] | None, source: str) -> None:
    """``generation.cache_interval`` reuses a UNet's deep blocks: refused on the MM-DiT families."""
    if family is None or getattr(spec.generation, "cache_interval", None) is None:
        return
    problem = family.cache_interval_problem()
    if problem:
        raise SpecError(f"{source}: generation.cache_interval: {problem}")


def check_excite(spec: JobSpec, family: type[ModelFamily] | None, source: str) -> None:
    """``generation.excite`` reads a UNet's cross-attention in text-to-image calls: refused on the MM-DiT families,
    on image-guided jobs, and beside ``cache_interval`` (its extra UNet call would count as a reuse step)."""
    gen = spec.generation
    if getattr(gen, "excite", None) is None:
        return
    problem, fix = family.excite_problem() if family is not None else None, "set generation.excite: null"
    if problem is None and getattr(spec, "references", None) is not None:
        problem = "it nudges text-to-image draws; a job with references (img2img, inpainting) cannot take it"
    if problem is None and getattr(gen, "cache_interval", None) is not None:
        problem = "its extra UNet call would count as a step of generation.cache_interval's reuse"
        fix = "set one of the two to null"
    if problem:
        raise SpecError(f"{source}: generation.excite: {problem}; {fix}")


def check_early_check(spec: JobSpec, family: type[ModelFamily] | None, folder: Path | None, source: str) -> None:
    """``generation.early_check`` (stages/early_check.py) is the judge's check on a UNet call's predicted clean image:
    refused without a judge, on the MM-DiT families, on image-guided jobs and with a scheduler that predicts no clean
    image (the folder's own, read from its scheduler config, or the one the job names)."""
    gen = spec.generation
    if getattr(gen, "early_check", None) is None:
        return
    from stages.early_check import clean_problem
    from stages.model import SCHEDULERS

    problem, fix = family.early_check_problem() if family is not None else None, "set generation.early_check: null"
    if problem is None and getattr(spec, "references", None) is not None:
        problem = "it checks text-to-image draws; a job with references (img2img, inpainting) cannot take it"
    if problem is None and getattr(spec, "judge", None) is None:
        problem, fix = "it is the judge's check part-way through a draw, and the job has no judge", "add a judge section"
    if problem is None:
        if gen.scheduler != "default":
            cls, overrides = SCHEDULERS[gen.scheduler]
            problem = clean_problem(cls.__name__, overrides)
        elif folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
            config = _read_json(folder / "scheduler" / "scheduler_config.json", source)
            problem = clean_problem(str(config.get("_class_name")), config)
        fix = "or set generation.early_check: null"
    if problem:
        raise SpecError(f"{source}: generation.early_check: {problem}; {fix}")


#: input channels of the UNet of an inpainting checkpoint: 4 latent + 1 mask + 4 masked-image latent
INPAINTING_UNET_CHANNELS = 9


def check_inpainting_model(spec: JobSpec, folder: Path, family: type[ModelFamily], source: str) -> None:
    """An inpainting checkpoint (a 9-channel UNet: SD / SDXL inpainting) only repaints masked regions: it takes
    ``references.mode: inpaint`` jobs and no other."""
    if family.denoiser != "unet":
        return
    channels = _read_json(folder / family.denoiser / "config.json", source).get("in_channels")
    refs = getattr(spec, "references", None)
    if channels == INPAINTING_UNET_CHANNELS and (refs is None or refs.mode != "inpaint"):
        raise SpecError(f"{source}: model.path: {folder} is an inpainting checkpoint (unet in_channels 9): it only "
                        "repaints masked regions; set references.mode: inpaint, or use a text-to-image checkpoint")


#: a job side outside [native / FAR, native x FAR] is far from what the model was trained at
FAR = 2


def size_warning(spec: JobSpec) -> str:
    """One warning line when the job's image size is far from the local model's native one (the denoiser's
    ``sample_size`` x the VAE's downscale factor): a model draws poorly off its size, and a much larger
    image costs hours; '' otherwise (or for a hub id, or a config without a ``sample_size``)."""
    folder = model_folder(spec)
    if folder is None:
        return ""
    try:
        family = resolve_family(folder, spec.model.family, json.loads((folder / "model_index.json").read_text()))
        sample = json.loads((folder / family.denoiser / "config.json").read_text()).get("sample_size")
        factor = 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError, FamilyError):
        return ""
    if not isinstance(sample, int):
        return ""
    native, gen = sample * factor, spec.generation
    if native / FAR <= max(gen.height, gen.width) <= native * FAR:
        return ""
    return (f"warning: generation: {gen.height}×{gen.width} is far from the model's native {native}×{native} "
            f"({family.denoiser} sample_size {sample} × the VAE's factor {factor}): expect poor drawings"
            f"{' and long runs' if max(gen.height, gen.width) > native else ''}; set generation.height and width "
            f"near {native}")


def job_family(spec: JobSpec) -> type[ModelFamily] | None:
    """The job's model family without loading weights or going online: a local folder's (``resolve_family``),
    ``model.family`` when set, else a hub id's from the cached ``model_index.json``; None when unknown."""
    folder = model_folder(spec)
    try:
        if folder is not None:
            return resolve_family(folder, spec.model.family, json.loads((folder / "model_index.json").read_text()))
        if spec.model.family != AUTO:
            return family_class(spec.model.family)
        if not hub_cached(spec.model.path):
            return None
        from huggingface_hub import try_to_load_from_cache

        index = Path(try_to_load_from_cache(spec.model.path, "model_index.json"))
        name = json.loads(index.read_text()).get("_class_name")
        return next((f for f in all_families() if name in f.pipeline_classes), None)
    except (OSError, ValueError, TypeError, AttributeError, FamilyError):
        return None


def dtype_warning(spec: JobSpec) -> str:
    """One warning line for float16 on an MM-DiT family (SD3, Flux): their transformers overflow in fp16
    (NaN / inf images and maps, rejected as ``non-finite``: stages/finite.py); '' otherwise."""
    if spec.model.dtype != "float16":
        return ""
    family = job_family(spec)
    if family is None or not issubclass(family, MMDiTFamily):
        return ""
    return (f"warning: model.dtype: float16 on a {family.title} model ({family.name}): its MM-DiT transformer "
            "overflows in float16: images and attention maps may come out NaN / inf, and those samples are "
            "rejected as 'non-finite'; set model.dtype: bfloat16")


def compile_warning(spec: JobSpec) -> str:
    """One line for ``model.compile`` on a CPU: each worker's first batch compiles the denoiser (minutes) and the
    compiled CPU graph was measured slower than eager (docs/history.md); '' otherwise."""
    if not spec.model.compile or spec.model.device != "cpu":
        return ""
    return ("warning: model.compile: on a CPU each synthesis worker's first batch compiles the denoiser (minutes, "
            "without output) and the compiled graph ran slower than eager here; set model.compile: false on CPU")


def job_warnings(spec: JobSpec) -> list[str]:
    """Every pre-flight warning of a job (one line each), computed here once for ``validate`` and ``run``."""
    return [w for w in (size_warning(spec), dtype_warning(spec), compile_warning(spec)) if w]


def check_layout(folder: Path, source: str, override: str = "auto") -> type[ModelFamily]:
    """model_index.json names a supported family whose components are all there, weights as safetensors."""
    index_path = folder / "model_index.json"
    index = _read_json(index_path, source)
    try:
        family = resolve_family(folder, override, index)
    except FamilyError as e:
        field = "model.family" if override != "auto" else "model.path"
        raise SpecError(f"{source}: {field}: {index_path}: {e}") from None
    for component, config in family.components.items():
        entry = index.get(component)
        if component in family.optional and entry in ([None, None], None):
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise SpecError(f"{source}: model.path: {index_path} lists no {component} (got {entry!r}); a "
                            f"{family.title} folder needs {', '.join(family.components)}")
        where = folder / component
        if not where.is_dir():
            raise SpecError(f"{source}: model.path: component {component}: folder {where} is missing")
        _read_json(where / config, source)
        if component in family.weighted:
            check_safetensors(where, component, source)
    return family


def check_safetensors(where: Path, component: str, source: str) -> None:
    """The component folder holds weights the loader reads: ``<name>.safetensors`` (or its sharded index)."""
    files = sorted(p.name for p in where.iterdir() if p.is_file())
    plain = [f for f in files if f.endswith(".safetensors") and "." not in f.removesuffix(".safetensors")]
    indexes = [f for f in files if f.endswith(".safetensors.index.json")]
    if plain or indexes:
        for name in plain or _shards(where / indexes[0], component, source):
            check_weights_file(where / name, component, source)
        return
    weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES)]
    variants = [f for f in weights if f.endswith(".safetensors")]
    if variants:
        raise SpecError(f"{source}: model.path: component {component} has only variant weights "
                        f"({', '.join(variants)}); the loader reads plain safetensors (no variant): load them with "
                        "diffusers (variant=...) and save_pretrained(new_folder, safe_serialization=True)")
    if weights:
        raise SpecError(f"{source}: model.path: component {component} has only {', '.join(weights)}; safetensors are "
                        f"required (the loader never unpickles .bin/.ckpt files): {CONVERT}")
    raise SpecError(f"{source}: model.path: component {component} has no weights (no *.safetensors in {where})")


def _shards(index: Path, component: str, source: str) -> list[str]:
    """The weight files a sharded ``*.safetensors.index.json`` names (plain names in its folder)."""
    weight_map = _read_json(index, source).get("weight_map")
    names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not names or any(not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors") for n in names):
        raise SpecError(f"{source}: model.path: component {component}: {index} does not map tensors to .safetensors "
                        "files in its folder; restore it from the model's source")
    return names


def check_weights_file(path: Path, component: str, source: str) -> None:
    """A safetensors file whose header is whole and whose tensors all lie inside the file (safetensors' own
    check, on the header alone: a truncated or half-copied file fails here, not after the model loads)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except FileNotFoundError:
        raise SpecError(f"{source}: model.path: component {component}: {path} is missing; restore it from the "
                        "model's source") from None
    except (SafetensorError, OSError) as e:
        raise SpecError(f"{source}: model.path: component {component}: {path} is not a whole safetensors file "
                        f"({' '.join(str(e).split())[:120]}); it is truncated or damaged: copy it again from the "
                        "model's source") from None


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings off (bad input must stay one line on stderr), restored afterwards."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class Tokenizer:
    """What pre-flight asks of the sampler's tokenizer: token ids, the unknown token, the length limit."""

    encode: Callable[[str, bool], list[int]]  # (text, add BOS/EOS) -> ids, never padded or truncated
    unk_token: str | None
    unk_token_id: int | None
    model_max_length: int

    def ids(self, text: str, special: bool = False) -> list[int]:
        return self.encode(text, special)


def load_tokenizer(where: Path, source: str) -> Tokenizer:
    """The sampler's tokenizer (transformers' CLIPTokenizer from ``<model>/tokenizer``: vocabulary files only).

    A folder with ``tokenizer.json`` and its limit and unknown token in ``tokenizer_config.json`` is read
    with the ``tokenizers`` library directly, which is what CLIPTokenizer runs on it (same ids:
    tests/test_bad_input.py) without importing transformers (~1.5 s): ``synthgen validate`` stays fast.
    """
    files = {p.name for p in where.iterdir()} if where.is_dir() else set()
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise SpecError(f"{source}: model.path: the tokenizer in {where} has no vocabulary (tokenizer.json, or "
                        "vocab.json + merges.txt); restore it from the model's source")
    try:
        return _fast_tokenizer(where) or _clip_tokenizer(where)
    except Exception as e:  # noqa: BLE001 - any failure here is a broken tokenizer folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SpecError(f"{source}: model.path: the tokenizer in {where} does not load ({type(e).__name__}: "
                        f"{first[:200]}); restore its files (vocab.json + merges.txt or tokenizer.json)") from None


def _fast_tokenizer(where: Path) -> Tokenizer | None:
    config_path, file = where / "tokenizer_config.json", where / "tokenizer.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    unk, limit = config.get("unk_token"), config.get("model_max_length")
    if not (file.is_file() and isinstance(unk, str) and isinstance(limit, int)):
        return None
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(file))
    backend.no_padding()
    backend.no_truncation()
    return Tokenizer(lambda text, special: backend.encode(text, add_special_tokens=special).ids, unk,
                     backend.token_to_id(unk), limit)


def _clip_tokenizer(where: Path) -> Tokenizer:
    with _quiet_transformers():
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(where.parent), subfolder=where.name)

    def encode(text: str, special: bool) -> list[int]:
        with _quiet_transformers():
            return tok(text, add_special_tokens=special, truncation=False, verbose=False).input_ids

    return Tokenizer(encode, tok.unk_token, tok.unk_token_id, tok.model_max_length)


def class_words(spec: JobSpec) -> Iterator[tuple[str, str]]:
    """(field path, word) of every class name, synonym and attribute."""
    for i, cls in enumerate(spec.classes):
        yield f"classes[{i}].name", cls.name
        for j, word in enumerate(cls.synonyms):
            yield f"classes[{i}].synonyms[{j}]", word
        for j, word in enumerate(cls.attributes):
            yield f"classes[{i}].attributes[{j}]", word


def _which(name: str) -> str:
    return "tokenizer" if name == "tokenizer" else f"tokenizer ({name})"


def check_words(spec: JobSpec, tokenizer: Tokenizer, source: str, name: str = "tokenizer") -> None:
    """Every class word is at least one token and none is the unknown token (the masks follow the tokens)."""
    unk = tokenizer.unk_token_id
    for field, word in class_words(spec):
        ids = tokenizer.ids(word)
        if not ids:
            raise SpecError(f"{source}: {field}: {_short(word)} becomes no token at all (the {_which(name)} drops its "
                            "characters), so no attention map can follow it; use a visible word")
        if unk is not None and unk in ids:
            chars = sorted({c for c in word if unk in tokenizer.ids(c)})
            shown = f" ({', '.join(map(repr, chars))})" if chars else ""
            raise SpecError(f"{source}: {field}: {_short(word)} has characters the model's {_which(name)} does not "
                            f"know{shown}: they become {tokenizer.unk_token!r} tokens, so the prompt loses them and "
                            "a mask would follow no word; write it with characters the tokenizer knows")


#: more pieces than this for a number word ('two', 'three') mean the tokenizer spells it out: real CLIP and
#: T5 vocabularies have each as one token; the bundled shapes-world tokenizer has none (t-h-r-e-e)
NUMBER_WORD_PIECES = 2


def check_count_words(spec: JobSpec, tokenizer: Tokenizer, source: str, name: str = "tokenizer") -> None:
    """``prompts.count_style: number`` asks for k > 1 objects of a class in words ('three red circles'); a
    tokenizer that spells the number word out piece by piece never gave the model that word to learn, so
    the prompt asks for no count and the label stage would split the class into objects never drawn."""
    prompts = spec.prompts
    if prompts.max_instances_per_class < 2 or prompts.count_style != "number":
        return
    for count in range(2, prompts.max_instances_per_class + 1):
        number = count_words(count, spec.classes[0].name)[0]
        pieces = len(tokenizer.ids(number))
        if pieces > NUMBER_WORD_PIECES:
            example = count_phrase(2, None, spec.classes[0].name, "repeat")[0]
            raise SpecError(f"{source}: prompts.count_style: 'number' asks for counts in words, but the model's "
                            f"{_which(name)} splits {number!r} into {pieces} pieces (it does not know the word, so "
                            f"the model cannot have learned counts); set prompts.count_style: repeat (the class "
                            f"phrase k times: {example!r})")


@dataclass(frozen=True)
class Slot:
    """One class as the sampler writes it at its longest: 'a {attribute} {word}' (or 'a {word}'; with
    ``prompts.max_instances_per_class`` > 1 at that count: 'three {attribute} {plural}' or the repeats)."""

    index: int
    text: str
    tokens: int
    field: str  # the class's longest part: its longest word or its longest attribute


def _longest(tokenizer: Tokenizer, fields: list[tuple[str, str]]) -> tuple[str, str, int] | None:
    counted = [(field, word, len(tokenizer.ids(word))) for field, word in fields]
    return max(counted, key=lambda c: c[2]) if counted else None  # the first of equals: max keeps the first


def _slot(tokenizer: Tokenizer, i: int, cls: Any, prompts: Any) -> Slot:
    word = _longest(tokenizer, [(f"classes[{i}].name", cls.name)] +
                    [(f"classes[{i}].synonyms[{j}]", s) for j, s in enumerate(cls.synonyms)])
    attribute = _longest(tokenizer, [(f"classes[{i}].attributes[{j}]", a) for j, a in enumerate(cls.attributes)])
    text = count_phrase(prompts.max_instances_per_class, attribute[1] if attribute else None, word[1],
                        prompts.count_style)[0]
    field = attribute[0] if attribute and attribute[2] > word[2] else word[0]
    return Slot(i, text, len(tokenizer.ids(text)), field)


def _fill(tokenizer: Tokenizer, templates: list[str], slots: list[Slot]) -> tuple[int, int, str]:
    """(tokens with BOS/EOS, template index, prompt) of the longest prompt these slots make in any template."""
    objects = " and ".join(s.text for s in slots)
    filled = []
    for t, template in enumerate(templates):
        prefix, suffix = template.split(OBJECTS)
        prompt = prefix + objects + suffix
        filled.append((len(tokenizer.ids(prompt, special=True)), t, prompt))
    return max(filled, key=lambda f: (f[0], -f[1]))


def longest_prompts(spec: JobSpec, tokenizer: Tokenizer) -> tuple[list[Slot], int]:
    """Each class at its longest (longest word and longest attribute, as the sampler writes them) and the
    number of classes per image (1 for image-guided variations).

    The longest prompt is then the ``count`` longest slots in the longest template: the sampler joins
    classes with ' and ' into the template's {objects}. It assumes every class can get its longest
    attribute: the sampler prefers distinct attributes within an image, so when several classes
    share their longest attribute this errs long by the difference to their next one.
    """
    slots = [_slot(tokenizer, i, cls, spec.prompts) for i, cls in enumerate(spec.classes)]
    count = 1 if spec.references is not None else min(spec.prompts.max_classes_per_image, len(slots))
    return slots, count


def check_prompt_length(spec: JobSpec, tokenizer: Tokenizer, source: str, name: str = "tokenizer") -> None:
    """The longest prompt fits the tokenizer; the error names the template, the class or the class count."""
    limit = tokenizer.model_max_length
    templates = list(spec.prompts.templates)
    slots, count = longest_prompts(spec, tokenizer)
    over = f"over the {_which(name)}'s limit of {limit} (model_max_length in {Path(spec.model.path).name}/{name})"
    shortest = min(slots, key=lambda s: s.tokens)
    for t, template in enumerate(templates):
        n, _, prompt = _fill(tokenizer, [template], [shortest])
        if n > limit:
            raise SpecError(f"{source}: prompts.templates[{t}]: this template makes {n}-token prompts with a single "
                            f"class ({_short(prompt, 60)}), {over}; shorten the template")
    for slot in slots:
        n, _, prompt = _fill(tokenizer, templates, [slot])
        if n > limit:
            name = spec.classes[slot.index].name
            if spec.prompts.max_instances_per_class > 1:
                raise SpecError(f"{source}: prompts.max_instances_per_class: {spec.prompts.max_instances_per_class} "
                                f"instances of class {_short(name)} make prompts of up to {n} tokens "
                                f"({_short(prompt, 60)}), {over}; lower it or shorten the templates or class words")
            raise SpecError(f"{source}: {slot.field}: class {_short(name)} makes prompts of up to {n} tokens "
                            f"({_short(prompt, 60)}), {over}; shorten it")
    if count > 1:
        worst = sorted(slots, key=lambda s: -s.tokens)[:count]
        n, _, prompt = _fill(tokenizer, templates, worst)
        if n > limit:
            names = [spec.classes[s.index].name for s in worst]
            raise SpecError(f"{source}: prompts.max_classes_per_image: {count} classes per image make prompts of up "
                            f"to {n} tokens (classes {', '.join(map(_short, names))}: {_short(prompt, 80)}), {over}; "
                            "lower max_classes_per_image" + (" or max_instances_per_class" if
                                                             spec.prompts.max_instances_per_class > 1 else "")
                            + " or shorten the templates or class words")


def check_capture(spec: JobSpec, folder: Path, family: type[ModelFamily], source: str) -> None:
    """The capture levels name attention levels of this model at the job's size (the family's ``capture_plan``,
    from configs only); self-attention fits."""
    gen = spec.generation
    try:
        family.capture_plan(folder, spec.masks, gen.height, gen.width)
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"{source}: model.path: {folder}: cannot read the {family.denoiser} / vae config "
                        f"({type(e).__name__}: {e}); restore it from the model's source") from None
    except ValueError as e:
        message = str(e)
        field, _, reason = message.partition(": ")
        if field in ("capture_resolutions", "self_attention_resolution", "capture_blocks"):
            raise SpecError(f"{source}: masks.{field}: {reason}") from None
        raise SpecError(f"{source}: model.path: {folder / family.denoiser / 'config.json'}: {message}; synthgen "
                        f"captures attention of {family.title} models with this layout") from None


def check_output_dir(spec: JobSpec, source: str) -> None:
    """The output dir can be ours: absent, empty, or with synthgen's files (after ``load_spec``, which refuses
    a file; the writer checks ownership and fingerprint in full when a run opens the dir). A dir that lost
    its manifest but holds shards is left to ``synthgen repair``."""
    from .dataset import output_state

    try:
        output_state(spec.output.dir)  # a path or a URI (pipeline/storage.py): never Path() it
    except UsageError as e:
        raise SpecError(f"{source}: {e}") from None
