"""Background jobs: the job store and the worker process that runs one job."""
