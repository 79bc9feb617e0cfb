"""The API's documented bounds, in one import-free place (docs/server.md lists them too)."""

MAX_PROMPT_CHARS = 4000  # prompt / message text (characters: a cheap first cut before tokens are counted)
MAX_PROMPT_TOKENS = 2048  # the rendered prompt in tokens (--max-prompt-tokens); the model's context bounds it too
MAX_NEW_TOKENS = 1024  # max_length, max_tokens
MAX_VECTORS = 8  # steering entries per request
STRENGTH_LIMIT = 20.0  # |strength|, residual-norm units
MAX_LAYERS_PER_ENTRY = 64
MAX_CONTRAST_TEXTS = 64  # per side, POST /vectors
MAX_CONTRAST_CHARS = 2000  # per contrast text
MAX_MESSAGES = 64  # /v1/chat/completions
MAX_CONTENT_PARTS = 64  # text parts of one chat message
MAX_BODY_BYTES = 1 << 20  # request body, checked before JSON parsing (413 past it)
MAX_ERROR_ITEMS = 20  # validation errors listed in one 422 body
MIN_SAMPLING_TEMPERATURE = 1e-3  # below it (and above 0) sampling is greedy: logits / T would overflow
