"""The evaluation layer (top of the module map; may import anything below it).

- `motion_bench`: the held-out multi-object motion-binding benchmark (scenes from the synthetic generator with seeds
  training never uses: first frame, first-frame masks, prompts, ground-truth video and masks, `requests.jsonl`).
- `motion`: motion measured from mask tracks (direction, still, grow / shrink) and its tolerances.
- `judge`: the independent judge of generated videos: finds each object by its colour, measures binding accuracy and
  trajectory IoU against the benchmark (`judge_benchmark`), and scores stage-1 trajectories (`score_trajectory`).
"""
