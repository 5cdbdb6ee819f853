"""The package's layers import downward only (DESIGN.md): a module-level import of a higher layer is an error.
Imports inside functions may reach up (a convenience method such as Transformer.generate)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmforge"
LAYERS = [  # lowest first
    ("lmforge", "lmforge.errors", "lmforge.io", "lmforge.config", "lmforge.lazy", "lmforge.device"),
    ("lmforge.data", "lmforge.tasks", "lmforge.tokenizer"),
    ("lmforge.model", "lmforge.convert"),
    ("lmforge.peft",),
    ("lmforge.objectives",),
    ("lmforge.train",),
    ("lmforge.infer",),
    ("lmforge.stages",),
    ("lmforge.eval",),
    ("lmforge.serve",),
    ("lmforge.cli", "lmforge.quickstart", "lmforge.speedrun", "lmforge.speedrun_report", "lmforge.__main__"),
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer"
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return [name for name in found if name == "lmforge" or name.startswith("lmforge.")]


def test_layers_import_downward_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported in top_level_imports(path):
            if layer_of(imported) > layer_of(importer):
                upward.append(f"{importer} -> {imported}")
    assert not upward, upward


def test_the_model_package_knows_nothing_of_inference_training_or_the_cli():
    for path in (PACKAGE / "model").rglob("*.py"):
        source = path.read_text()
        for higher in ("lmforge.infer", "lmforge.train", "lmforge.cli", "lmforge.stages", "lmforge.objectives"):
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(higher):
                    assert path.name == "transformer.py" and node.module.startswith("lmforge.infer"), \
                        f"{path.name} imports {node.module}"
