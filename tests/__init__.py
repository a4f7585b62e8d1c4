"""The test suite: a package, so test and case modules import each other by name
(tests.<area>.<module>) in the test process and in every spawned rank."""
