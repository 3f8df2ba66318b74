"""Executes artifacts. Never imports dacc.compiler: the contract is dacc.schema."""
