"""What a person reads: the verdict, the report, the charts, and comparisons of runs
and of domain sets."""
