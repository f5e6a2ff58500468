"""Which fields of an algorithm file's Config are read by the code that runs.

`unread_fields(module)` parses the module's source and collects attribute reads
`cfg.<name>` (and of names bound to the config: `c = self.cfg`, `c = cfg`, `self.cfg.<name>`,
`getattr(cfg, "<name>")`, `getattr(cfg, f"prob_{m}")`, and the PPOConfig fields that
`rl.ppo_config(cfg, ...)` copies) in every function except
`validate`. Docstrings and comments are not code, so mentioning a field there does not count.
Inside the Config class, a property counts only when something that runs reads it (the
runner reads `num_updates` and `steps_per_update`), and then the `self.<field>` reads in its
body count too.

A flag that no code reads lies to the user; each algorithm's test asserts
`unread_fields(module) == []` (or names, with a reason, the few it expects).
"""

import ast
import dataclasses
import inspect
import re

from common.rl import PPOConfig

PPO_FIELDS = {f.name for f in dataclasses.fields(PPOConfig)}
"""PPOConfig fields, which `common.rl.ppo_config(cfg, ...)` reads from an algorithm's Config."""

RUNNER_READS = {"num_updates", "steps_per_update"}
"""Config properties the runner (common/run.py, common/bench.py) reads itself."""


def _config_names(tree: ast.AST) -> set[str]:
    """`cfg` and local names bound to a config (`c = self.cfg`, `c = cfg`)."""
    names = {"cfg"}
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
                if not isinstance(target, ast.Name) or target.id in names:
                    continue
                if (isinstance(value, ast.Name) and value.id in names) or (
                    isinstance(value, ast.Attribute) and value.attr == "cfg"
                ):
                    names.add(target.id)
                    changed = True
    return names


def _is_config(node: ast.AST, names: set[str]) -> bool:
    return (isinstance(node, ast.Name) and node.id in names) or (
        isinstance(node, ast.Attribute) and node.attr == "cfg"
    )


def _reads(tree: ast.AST, names: set[str], fields: set[str]) -> set[str]:
    """Attribute names read from the config anywhere in `tree`."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            if _is_config(node.value, names):
                out.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "getattr" and len(node.args) >= 2
              and _is_config(node.args[0], names)):
            key = node.args[1]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                out.add(key.value)
            elif isinstance(key, ast.JoinedStr):  # f"prob_{m}": any field of that shape
                pattern = "".join(re.escape(v.value) if isinstance(v, ast.Constant) else ".+"
                                  for v in key.values)
                out |= {f for f in fields if re.fullmatch(pattern, f)}
        if (isinstance(node, ast.Call) and node.args and _is_config(node.args[0], names)
                and isinstance(node.func, ast.Attribute) and node.func.attr == "ppo_config"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "rl"):
            out |= PPO_FIELDS & fields  # rl.ppo_config(cfg, ...) copies the shared PPO fields
    return out


def _strip_validate(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [s for s in body if not (
                isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef) and s.name == "validate")]


def read_fields(module, config_cls=None) -> set[str]:
    """Names of the Config fields and properties read by the code that runs in `module`."""
    config_cls = config_cls or module.Config
    fields = {f.name for f in dataclasses.fields(config_cls)}
    tree = ast.parse(inspect.getsource(module))
    _strip_validate(tree)
    cls_node = next(n for n in ast.walk(tree)
                    if isinstance(n, ast.ClassDef) and n.name == config_cls.__name__)
    methods = {n.name: n for n in cls_node.body if isinstance(n, ast.FunctionDef)}
    cls_node.body = [n for n in cls_node.body if not isinstance(n, ast.FunctionDef)]
    names = _config_names(tree)
    read = _reads(tree, names, fields) | RUNNER_READS
    done: set[str] = set()
    while pending := (read & set(methods)) - done:  # properties read, and what they read
        for name in pending:
            read |= _reads(methods[name], {"self"}, fields)
            done.add(name)
    return read


def unread_fields(module, config_cls=None) -> list[str]:
    """Config fields that no running code of `module` reads, in declaration order."""
    config_cls = config_cls or module.Config
    read = read_fields(module, config_cls)
    return [f.name for f in dataclasses.fields(config_cls) if f.name not in read]
