"""The offline leak scan: a captured image's partitions mounted read-only, searched for leaks."""
