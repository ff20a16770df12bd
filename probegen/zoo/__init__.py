"""Model zoos: sources (embedded / download / own), one reader per published format, packed zoos, splits."""
