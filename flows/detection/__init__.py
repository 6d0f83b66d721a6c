"""The detection family's Prefect flows, one per stage, built by flows/factory.py from the specs in tasks/detection/.

`STAGE_FLOWS["<stage>"]` is the flow `kiln stage` runs (a foreach stage's flow takes its item), for deploying or
calling a family's flows from Python; nothing here is written by hand.
"""

from flows.factory import family_flows

STAGE_FLOWS = family_flows("detection")
