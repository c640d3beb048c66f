"""Fixtures for the NBD client core integration tests (test/core): the
nbdc-cli driver, qemu-nbd and nbd-server, TLS keys and certificates made at
test time.  They live in nbdc_helpers.py (importable by the tests); listing
them here makes pytest register them.  Every server is killed by pid in a
`finally`; nothing outlives its test.
"""
from nbdc_helpers import cli, repl, qemu_nbd, nbd_server, psk_file, x509  # noqa: F401
