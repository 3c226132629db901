"""Integrations with other training stacks. Importing this package imports none of them.

- `llamafactory`: LLaMA-Factory's own `pt` / `sft` workflows with a steered trainer class (needs the
  optional `llamafactory` package; see docs/migration.md).
- `dataflex`: DataFlex's flat config keys translated into the native `steering:` section (no extra
  dependency).
"""
