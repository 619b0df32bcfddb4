"""The code an export carries for transformers' remote-code loader: md4_dist's own modules, copied
with their md4_dist imports made relative, beside config.json, which names the wrapper's classes.

    files = remote_code.files()            # {"modeling_md4.py": b"...", "model.py": b"...", ...}
    config = {**remote_code.CONFIG_KEYS, ...}

The loader (transformers.dynamic_module_utils) copies the file auto_map names and, recursively,
every `from .name import ...` it finds, as name.py from the same directory: the copies are flat,
one package, so `from md4_dist.diffusion.schedules import X` becomes `from .schedules import X`.
It also refuses a module whose absolute imports name a package that is not installed, so no
copied module may import md4_dist; `files` checks that, and that each relative import has its
file. Importing this module needs neither transformers nor torch.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

# md4_dist's modules the exported model needs -> their files in the export: the wrapper, the
# denoiser, its output layer, the schedules and the samplers.
MODULES = {
    "md4_dist.hf.modeling_md4": "modeling_md4.py",
    "md4_dist.model": "model.py",
    "md4_dist.output_head": "output_head.py",
    "md4_dist.diffusion.schedules": "schedules.py",
    "md4_dist.diffusion.checks": "checks.py",
    "md4_dist.sampling_draws": "sampling_draws.py",
    "md4_dist.sampling": "sampling.py",
}
MODEL_TYPE = "md4"  # modeling_md4.MD4Config.model_type
# config.json's keys for transformers' Auto classes
CONFIG_KEYS = {
    "model_type": MODEL_TYPE,
    "architectures": ["MD4Model"],
    "auto_map": {"AutoConfig": "modeling_md4.MD4Config", "AutoModel": "modeling_md4.MD4Model"},
}

_PACKAGE = Path(__file__).resolve().parents[1]  # md4_dist/
_IMPORT = re.compile(r"^from (md4_dist(?:\.\w+)+) import ", re.MULTILINE)


def _source(module: str) -> str:
    return (_PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")).read_text(encoding="utf-8")


def files() -> dict[str, bytes]:
    """Each file of the exported model's code by its name in the export: md4_dist's source with
    `from md4_dist.<module> import` made `from .<its file> import`."""
    out = {}
    for module, name in MODULES.items():
        def relative(m, module=module):
            if m.group(1) not in MODULES:
                raise RuntimeError(f"{module} imports {m.group(1)}, which the export does not carry "
                                   "(md4_dist/hf/remote_code.py, MODULES)")
            return f"from .{MODULES[m.group(1)].removesuffix('.py')} import "

        text = _IMPORT.sub(relative, _source(module))
        _check(name, text)
        out[name] = text.encode()
    return out


def _check(name: str, text: str) -> None:
    """What the loader needs of a copied module: no import of md4_dist, and only the relative
    imports it copies (`from .name import ...`, name a file of the export)."""
    carried = {f.removesuffix(".py") for f in MODULES.values()}
    for node in ast.walk(ast.parse(text, name)):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] == "md4_dist"]
        elif isinstance(node, ast.ImportFrom):
            top = (node.module or "").split(".")[0]
            bad = [node.module] if node.level == 0 and top == "md4_dist" else []
            if node.level and (node.level != 1 or node.module not in carried):
                bad = [f"{'.' * node.level}{node.module or ''}"]
        else:
            continue
        if bad:
            raise RuntimeError(f"{name} (line {node.lineno}) imports {bad[0]}: transformers' loader "
                               "copies only `from .<file> import ...` of the export's own files")
