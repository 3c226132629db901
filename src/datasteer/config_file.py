"""Reading a YAML config file: UTF-8 checked, duplicate keys refused, alias expansion bounded.

Why a module of its own: the CLI peeks at a file (LLaMA-Factory or native?) before `load_config` reads it, and
both must fail the same way on the same bad file. What is guarded, and why:

- bytes that are not UTF-8 (a config saved as Latin-1): an error naming the line and the byte, with `iconv`;
- a repeated key, which plain YAML resolves by silently dropping the first;
- YAML aliases (`*a`) that expand to an enormous value (the "billion laughs"): PyYAML shares the aliased node,
  so loading is cheap, but every later walk of the value (validation, the error that echoes it, the saved
  `datasteer_config.yaml`) expands it. A document that would expand to more than `MAX_EXPANDED_NODES` nodes
  is refused before it is constructed.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from datasteer.errors import ConfigError

MAX_EXPANDED_NODES = 1_000_000  # a real config has hundreds; a LLaMA-Factory dataset_info a few thousand
MAX_CONFIG_BYTES = 16 << 20


def read_config_text(path: Path) -> str:
    """The text of a config file; a file that is not UTF-8 (or is huge) is an error naming where and how to fix."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} holds {size} bytes: that is not a config file. Pass the path of a YAML config.")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{path} is not UTF-8: line {line} holds the byte 0x{data[err.start]:02x}, which does not decode. Save "
            f"it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed.yaml` if it was written as Latin-1."
        ) from None


def load_yaml(text: str) -> Any:
    """Parse one YAML document with `UniqueKeyLoader`; raises `yaml.YAMLError` or `ConfigError`."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a repeated key is an error (plain YAML keeps the last and drops the first silently),
    and a document whose aliases expand to more than `MAX_EXPANDED_NODES` nodes is refused."""

    def construct_document(self, node: yaml.Node) -> Any:
        expanded = _expanded_size(node, {}, MAX_EXPANDED_NODES)
        if expanded > MAX_EXPANDED_NODES:
            raise ConfigError(
                f"the YAML expands to more than {MAX_EXPANDED_NODES:,} values through its aliases (*name refers "
                "to &name): a config never needs that many, and expanding them would take unbounded memory. "
                "Remove the nested aliases."
            )
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # the safe loader's own error names an unhashable key
            if key in seen:
                raise ConfigError(
                    f"duplicate key '{key}' at line {line} (first at line {seen[key]}); YAML would keep only the "
                    "last one and silently drop the other. Merge them into one."
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int], cap: int) -> int:
    """Nodes of the value once every alias is expanded, counted once per shared node (memo) and capped."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = cap + 1  # a node that contains itself (a recursive alias) expands without end
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    for child in children:
        total = min(cap + 1, total + _expanded_size(child, memo, cap))
    memo[id(node)] = total
    return total
