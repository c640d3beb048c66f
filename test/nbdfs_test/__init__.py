"""Helpers of the nbdfs test suites, one importable package (test/ is on
pytest's `pythonpath`, see test/pytest.ini), so every test directory imports
them the same way, e.g. `from nbdfs_test.polling import wait_for`:

  build     where the sources and the build under test are
  polling   deadlines: wait_for, wait_pid_exit, kill_and_wait, run
  servers   NbdServer, LoggedServer, NbdLog (nbdkit's log filter), readiness
  mounts    mounts, nbdfs daemons, Mount, the cleanup stack, loop devices
  data      the pattern oracle, nbdcopy/nbdinfo reads, files, O_DIRECT, images, xattrs
  threads   blocking calls on a thread under a deadline (Call, bounded)
  fsync_writer  the durability tests' checksummed fsync'd writer (its own process)
  core      nbdc-cli (the NBD client core driver): run_cli, Repl
  tls       certificates made with certtool

Fixtures live only in the conftest.py files (test/, test/core/, test/e2e/);
test/README.md says which suite is the home for what.
"""
