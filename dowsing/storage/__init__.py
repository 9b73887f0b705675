"""Work kept on disk: the diskcaches, the result store, and per-domain units of work
addressed by what they read."""
