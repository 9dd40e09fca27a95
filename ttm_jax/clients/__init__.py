"""The model clients shared by data preparation and generation, below both: the OpenAI-compatible chat client for LLMs
and VLMs (`llm.py`: `ChatClient`, `LLMError`), the segmenter (`segment.py`: Grounding DINO names -> boxes, SAM2 boxes ->
masks and video tracking; torch/transformers imported where used) and the numbered outlines drawn for the VLM and the
segmenter's overlays (`draw.py`). Layer 1: imports only `config` and `cli`."""
