"""What a run will cost before it starts: the cost of each stage, the machine's
calibrated speed constants, and the estimate as a record."""
