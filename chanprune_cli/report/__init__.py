"""Rendering: each command's result as rich tables for people and as a JSON document for scripts,
one module per command (`analyze`, `score`, `prune`, `finetune`, `export`, `bench`, `run`,
`config`), each with `show(..., json_report)`; `common` holds what they share and `plots` draws
bench's figure. Nothing here measures or loads anything: the recipes' results carry the numbers.
"""
