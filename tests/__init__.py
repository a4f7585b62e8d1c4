"""The test suite, a package so test and case modules import each other by name (tests.<area>.<module>)."""
