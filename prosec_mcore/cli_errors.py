"""Bad input to the command-line tools ends in one line, `error: <what is wrong>`, and exit code 2.

A user who gives a tool the wrong file should learn which file and what is wrong with it, not
read a traceback from deep inside json, torch.load or dist_checkpointing that names neither.
The tools therefore

* decorate `main` with :func:`exits_on_user_error`, which turns the errors that mean "the input
  is unusable" (:class:`UserInputError`, the config's `ConfigError`, malformed JSON or text, and
  file-system errors) into that one line. Anything else is a bug and keeps its traceback;
* read their input files through the checks here, which name the file, the line and the fix:
  :func:`iter_jsonl`, :func:`read_json`, :func:`writable_file`, :func:`check_hf_folder`,
  :func:`check_checkpoint` (before the model is built) and :func:`reading_checkpoint` (around
  the load itself);
* mark the stretches where a library's plain ValueError is about the user's input (parsing
  options, building the tokenizer they named) with :func:`user_input_errors`.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import sys
import warnings

from .config import ConfigError

RERUN_HINT = "it may be incomplete or corrupt: use an earlier checkpoint"


class UserInputError(ValueError):
    """A file, folder or option the user gave cannot be used; the message says which and why."""


# What a user's input can raise on its way in: none of these is a bug in the tool.
USER_ERRORS = (UserInputError, ConfigError, json.JSONDecodeError, UnicodeDecodeError, OSError)


def first_line(err: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of an error message, cut to `limit` characters if given: library
    errors (torch, transformers) often carry paragraphs of advice that do not fit one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def describe(err: BaseException) -> str:
    """One line for `err`. OSError's str ("[Errno 2] No such file or directory: 'x'") is reworded
    as "x: No such file or directory"."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        where = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
        return f"{where}: {err.strerror}"
    return first_line(err) or type(err).__name__


def exits_on_user_error(main):
    """Decorate a tool's `main`: a user-input error prints `error: <message>` on stderr and the
    tool returns 2. Other exceptions propagate with their traceback (they are bugs)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as err:
            sys.stdout.flush()
            print(f"error: {describe(err)}", file=sys.stderr, flush=True)
            return 2
    return wrapper


@contextlib.contextmanager
def user_input_errors(*types):
    """Within the block, exceptions of `types` (e.g. ValueError while building the tokenizer the
    user named) are about the user's input: they become UserInputError with the same message.
    Outside such blocks a plain ValueError stays a bug with a traceback."""
    try:
        yield
    except UserInputError:
        raise
    except types as err:
        raise UserInputError(describe(err)) from err


def _open(path: str, what: str):
    """`path` opened for reading, or a UserInputError saying why it cannot be."""
    if os.path.isdir(path):
        raise UserInputError(f"{path} is a directory, not {what}")
    if not os.path.exists(path):
        raise UserInputError(f"{path} not found: expected {what}")
    try:
        return open(path, "rb")
    except PermissionError:
        raise UserInputError(f"{path} cannot be read (permission denied)") from None


def iter_jsonl(path: str, key: str | None = None, hint: str = ""):
    """Yield (line number, record) for the lines of a JSON-lines file (blank lines skipped), each
    record a JSON object holding `key` when one is given; streamed, so a corpus of any size fits.
    A bad line raises UserInputError naming the file and the line; `hint` (e.g. which tool writes
    such files) ends the message."""
    tail = f"; {hint}" if hint else ""
    with _open(path, "a JSON-lines file") as f:
        for lineno, raw in enumerate(f, 1):  # bytes, decoded line by line: the error knows its line
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserInputError(f"{path} line {lineno} is not UTF-8 text (a binary file?){tail}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserInputError(f"{path} line {lineno} is not JSON ({err}){tail}") from None
            if not isinstance(record, dict):
                raise UserInputError(f"{path} line {lineno} is a JSON {type(record).__name__}, not an object{tail}")
            if key is not None and key not in record:
                raise UserInputError(f"{path} line {lineno} has no {key!r} key (keys: {sorted(record)}){tail}")
            yield lineno, record


def read_json(path: str, what: str = "a JSON file", hint: str = "") -> dict:
    """A JSON object from `path`, or a UserInputError naming the file and the problem."""
    tail = f"; {hint}" if hint else ""
    with _open(path, what) as f:
        try:
            value = json.loads(f.read().decode("utf-8"))
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path} is not valid JSON ({err}){tail}") from None
        except UnicodeDecodeError:
            raise UserInputError(f"{path} is not UTF-8 text (a binary file?){tail}") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{path} holds a JSON {type(value).__name__}, not an object{tail}")
    return value


def _can_create(folder: str, option: str, target: str) -> None:
    """Whether `folder` exists or can be made: its nearest existing ancestor must be a writable
    directory. Nothing is created, so a run that fails later leaves no empty folders behind."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserInputError(f"{option} {target} cannot be written: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise UserInputError(f"{option} {target} cannot be written: {probe} is not writable")


def writable_file(path: str, option: str) -> str:
    """Check output file `path` (given as `option`, e.g. --out) up front, so that a bad one fails
    before minutes of work rather than after them."""
    if os.path.isdir(path):
        raise UserInputError(f"{option} {path} is a directory; give a file name")
    _can_create(os.path.dirname(os.path.abspath(path)), option, path)
    return path


def writable_dir(path: str, option: str) -> str:
    """Output folder `path` must be a folder or be creatable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"{option} {path} exists and is a file; give a directory")
    _can_create(path, option, path)
    return path


# --- Hugging Face folders ----------------------------------------------------------------------

def check_hf_folder(folder: str) -> dict:
    """The config.json of a Hugging Face model folder, after checking that the folder has weights
    that open: transformers reports a missing or damaged file with a message about the Hub."""
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder} {'is not a folder' if os.path.exists(folder) else 'not found'}: "
                             f"expected a Hugging Face model folder (config.json and weights)")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise UserInputError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = read_json(config_path, "a model config")
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        shards = ["model.safetensors"]
    elif os.path.isfile(index_path):
        weight_map = read_json(index_path, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserInputError(f"{index_path} has no 'weight_map' object")
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return config
    else:
        raise UserInputError(f"{folder} has no weights (model.safetensors, model.safetensors.index.json "
                             f"or pytorch_model.bin)")
    from safetensors import SafetensorError, safe_open

    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise UserInputError(f"{folder} lacks the weight file {shard}")
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as err:
            raise UserInputError(f"{path} could not be read ({first_line(err, limit=160)}); it may be incomplete: "
                                 f"download or export the folder again") from None
    return config


# --- distributed checkpoints -------------------------------------------------------------------

def _reason(err: BaseException) -> str:
    """`TypeName: first sentence` of a library's read error. torch.load(weights_only=True) puts
    the actual cause after "WeightsUnpickler error:", below advice that does not apply here."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = first_line(text, limit=160).split(". ")[0]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _damaged(path: str, problem: str) -> UserInputError:
    return UserInputError(f"checkpoint {path} could not be read ({problem}); {RERUN_HINT}")


def _read_checkpoint_file(path: str, name: str, read):
    """read(file) for one file of checkpoint `path`, or the UserInputError that says which file is
    damaged. Catching Exception is deliberate and narrow: the block is a single library call that
    unpickles one file, and unpickling damaged bytes can raise nearly any exception type."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise _damaged(path, f"{name} is missing")
    try:
        return read(file)
    except Exception as err:  # noqa: BLE001 - see the docstring
        raise _damaged(path, f"{name}: {_reason(err)}") from err


def _load_json(file: str):
    with open(file, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def check_checkpoint(checkpoint: str) -> str:
    """The complete checkpoint that `checkpoint` names (the directory itself, or a run or save
    directory's latest), after checking that every file of it can be read: megatron's
    metadata.json, the common state (common.pt, which must be this project's), torch's .metadata
    and every shard it lists, at full length. A damaged checkpoint then fails here with a line
    naming the file, not later in the loader with an EOFError or an AssertionError."""
    if not os.path.exists(checkpoint):
        raise UserInputError(f"{checkpoint} not found: give a checkpoint directory or a run directory")
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    if os.path.isfile(os.path.join(checkpoint, "COMPLETE")):  # a checkpoint itself: nothing to resolve
        path = checkpoint
    else:  # a run or save directory (resolve_checkpoint's module imports megatron: seconds)
        from .training.checkpoint import resolve_checkpoint

        try:
            path = resolve_checkpoint(checkpoint)
        except FileNotFoundError as err:
            raise UserInputError(str(err)) from None
    from .training.checkpoint import verify_checkpoint

    verify_checkpoint(path)  # its manifest first: a missing or cut file, and which checkpoint to use instead
    metadata = _read_checkpoint_file(path, "metadata.json", _load_json)
    if not isinstance(metadata, dict) or metadata.get("sharded_backend") != "torch_dist":
        raise _damaged(path, "metadata.json does not name the torch_dist format")
    common = _read_checkpoint_file(path, "common.pt", lambda f: torch.load(f, map_location="cpu"))
    if not isinstance(common, dict) or "config" not in common or "vocab_size" not in common:
        raise UserInputError(f"checkpoint {path} was not written by prosec-mcore (common.pt has no run config)")
    tensors = _read_checkpoint_file(path, ".metadata", lambda f: FileSystemReader(os.path.dirname(f)).read_metadata())
    needed = collections.defaultdict(int)  # shard file -> the bytes the metadata says it holds
    for info in tensors.storage_data.values():
        needed[info.relative_path] = max(needed[info.relative_path], info.offset + info.length)
    for shard, size in sorted(needed.items()):
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise _damaged(path, f"shard {shard} is missing")
        if os.path.getsize(file) < size:
            raise _damaged(path, f"shard {shard} is truncated: {os.path.getsize(file)} of {size} bytes")
    return path


@contextlib.contextmanager
def reading_checkpoint(path: str):
    """Around a dist_checkpointing load of `path`: the loaders' own errors (torch's
    CheckpointException, megatron's CheckpointingException) become one line naming the checkpoint,
    and torch's deprecation warnings about its own checkpoint API stay quiet."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|megatron)\.")
        try:
            yield
        except CheckpointException as err:  # one wrapped exception per failed rank
            failures = [exc for exc, _ in err.failures.values()]
            raise _damaged(path, _reason(failures[0]) if failures else "CheckpointException") from err
        except CheckpointingException as err:
            raise _damaged(path, _reason(err)) from err


@contextlib.contextmanager
def reading_tokenizer(path: str | None):
    """Around building the tokenizer at `path`: a file that is no tokenizer at all (not JSON, not
    text) becomes one line naming it. The `tokenizers` library reports a file it cannot parse
    with a bare `Exception`; only that exact type is caught, so real bugs keep their traceback."""
    hint = "give a tokenizer.json (tools/prepare_data.py writes one), a GPT-2 rank file or a char vocabulary"
    try:
        yield
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(f"{path} is not a tokenizer file ({_reason(err)}); {hint}") from None
    except Exception as err:  # noqa: BLE001 - re-raised unless it is the bare Exception of tokenizers
        if type(err) is not Exception:
            raise
        raise UserInputError(f"{path} is not a tokenizer file ({first_line(err, limit=160)}); {hint}") from None
