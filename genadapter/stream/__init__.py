"""Streaming: read documents from files, stdin or datasets into a state, checkpointed and resumable.

`sources` turns raw input into counted records, `reader` folds them into an AdapterState,
`checkpoint` keeps the resume bookkeeping and the signal handling, `commands` is the CLI.
"""
