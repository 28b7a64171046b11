"""MLPerf submission tooling: TEST01 compliance (``compliance``) and a local tree checker (``check``)."""
