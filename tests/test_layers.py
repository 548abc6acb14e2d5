"""The layers stay apart: a walk over every import statement (module level and inside functions)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_LIBRARIES = ("diffusers", "transformers", "peft", "open_clip", "accelerate")



def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _any_under(name: str, packages) -> bool:
    return any(_under(name, p) for p in packages)


# package folder -> (is this import forbidden there?, why)
RULES = {
    "raft_diffusion/core": (lambda n: _any_under(n, MODEL_LIBRARIES) or (_under(n, "raft_diffusion") and not _under(n, "raft_diffusion.core")),
                            "the core knows no model library and no other subpackage"),
    "raft_diffusion/report": (lambda n: _any_under(n, ("raft_diffusion.adapters", "raft_diffusion.rewards", "raft_diffusion.demo", *MODEL_LIBRARIES)),
                              "the report reads run folders only"),
    "raft_diffusion/rewards": (lambda n: _under(n, "raft_diffusion.adapters"), "rewards do not depend on adapters"),
    "aesthetic": (lambda n: _under(n, "raft_diffusion"), "aesthetic/ stands alone"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations() -> list[str]:
    out = []
    for folder, (forbidden, why) in RULES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            out += [f"{path.relative_to(ROOT)}:{line} imports {name} ({why})" for line, name in imports(path) if forbidden(name)]
    return out


def test_no_forbidden_imports():
    assert violations() == []


def test_the_walk_catches_a_forbidden_import(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import os\ndef f():\n    from raft_diffusion.adapters.llm import LLMAdapter\n")
    assert imports(sample) == [(1, "os"), (3, "raft_diffusion.adapters.llm")]
    core, _ = RULES["raft_diffusion/core"]
    assert core("raft_diffusion.adapters.llm") and core("raft_diffusion") and core("diffusers.utils")
    assert not core("raft_diffusion.core.stats") and not core("torch")
