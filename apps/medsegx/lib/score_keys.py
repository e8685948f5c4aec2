"""Keys the ``medsegx_uncertainty`` scoring task writes into the datastore's image info.

A leaf: the scoring task writes them, the ``uncertainty`` strategy reads them, neither
imports the other.
"""

SCORE_KEY = "medsegx_uncertainty"
MODEL_KEY = "medsegx_uncertainty_model"
TS_KEY = "medsegx_uncertainty_ts"
PROMPTS_KEY = "medsegx_uncertainty_prompts"
