"""The runs, start to end: one analysis (and its ranking step), the collection plan,
and the executor that runs their independent units."""
