"""Weights travel only as safetensors, and the remote-code files import only what requirements.txt declares."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import REMOTE_CODE_FILES, tiny_config
from transformers import AutoModelForObjectDetection

from modeling_pix2seq import Pix2SeqForObjectDetection


REPO_ROOT = Path(__file__).resolve().parent.parent
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model = Pix2SeqForObjectDetection(tiny_config())
    model.save_pretrained(folder)
    return model, folder


def test_saved_folder_holds_safetensors_weights_and_no_pickle(saved_model):
    _, folder = saved_model
    assert (folder / "model.safetensors").is_file()
    assert not [path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES]


@pytest.fixture
def folder_with_pickle(saved_model, tmp_path):
    """A copy of the saved model folder plus a `pytorch_model.bin` of all-zero weights."""
    model, saved = saved_model
    for path in saved.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    torch.save(
        {name: torch.zeros_like(value) for name, value in model.state_dict().items()}, tmp_path / "pytorch_model.bin"
    )
    return model, tmp_path


@pytest.mark.parametrize(
    "load", [Pix2SeqForObjectDetection.from_pretrained, AutoModelForObjectDetection.from_pretrained]
)
def test_loading_refuses_a_folder_whose_weights_are_only_a_pickle(folder_with_pickle, load):
    _, folder = folder_with_pickle
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        load(folder, trust_remote_code=True)


def test_loading_ignores_a_pickle_next_to_the_safetensors_weights(folder_with_pickle):
    model, folder = folder_with_pickle
    loaded = Pix2SeqForObjectDetection.from_pretrained(folder)
    expected = model.model.decoder.embed_tokens.weight
    assert expected.abs().sum() > 0  # the pickle's zeros would show
    torch.testing.assert_close(loaded.model.decoder.embed_tokens.weight, expected)


def test_asking_for_pickle_weights_is_refused(saved_model):
    with pytest.raises(ValueError, match="only from safetensors"):
        Pix2SeqForObjectDetection.from_pretrained(saved_model[1], use_safetensors=False)


def declared_distributions():
    """Normalised distribution names of requirements.txt (`-r` includes and markers aside)."""
    names = set()
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\s<>=!~\[;@]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def is_import_guard(node):
    """A `try` that catches ImportError (or a parent of it), as an optional dependency's import does."""
    caught = set()
    for handler in getattr(node, "handlers", []):
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        caught |= {getattr(name, "id", None) for name in types}
    return bool(caught & {"ImportError", "ModuleNotFoundError", "Exception", None})


def unguarded_imports(source):
    """Top-level module names imported outside a `try ... except ImportError` body (relative imports aside)."""
    found = set()

    def visit(node, guarded):
        if isinstance(node, ast.Import) and not guarded:
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not guarded:
            found.add(node.module.split(".")[0])
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            guards_children = guarded or (is_import_guard(node) and field == "body")
            for child in children:
                if isinstance(child, ast.AST):
                    visit(child, guards_children)

    visit(ast.parse(source), guarded=False)
    return found


def undeclared_imports(source):
    local_modules = {Path(name).stem for name in REMOTE_CODE_FILES}
    owners = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    return sorted(
        module
        for module in unguarded_imports(source) - set(sys.stdlib_module_names) - local_modules
        if not {name.lower().replace("_", "-") for name in owners.get(module, [])} & declared
    )


def test_import_checker_flags_an_unguarded_undeclared_import_and_accepts_a_guarded_one():
    assert undeclared_imports("import torch\nimport scipy.ndimage\nfrom yaml import safe_load\n") == ["scipy", "yaml"]
    guarded = "try:\n    import scipy\nexcept ImportError:\n    scipy = None\n"
    assert undeclared_imports(guarded) == []


@pytest.mark.parametrize("file_name", REMOTE_CODE_FILES)
def test_remote_code_file_imports_only_declared_dependencies(file_name):
    assert undeclared_imports((REPO_ROOT / file_name).read_text()) == []
