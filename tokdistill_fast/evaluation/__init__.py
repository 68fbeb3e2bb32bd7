"""Evaluation: the held-out measure (heldout), definition generation (definitions), `tokdistill eval` (evalrun)
and `tokdistill compare` (compare), which runs several methods through pipeline.py and scores them."""
