"""The `upstack` command and the commands it runs besides stages: report, layers, import-merge."""
