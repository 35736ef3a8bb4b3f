"""Request limits (OpenAI's where it has them), in one place. Token-length limits live with the engine
protocol (`length_problem`), since the engine checks them too."""

MAX_BODY_BYTES = 16 << 20  # a request body over this is refused with 413 before it is parsed
MAX_MESSAGES = 2048  # OpenAI's limit on chat messages
MAX_TOOLS = 128  # OpenAI's limit on tools
MAX_TOOL_SCHEMA_BYTES = 64 << 10  # one tool's `parameters`, serialised (grammar compile time grows with it)
MAX_N = 16
MAX_STOP_SEQUENCES = 16
# an image URL (server/multimodal.py): inline data, a local file, or http(s), which is refused (no fetching)
IMAGE_URL_PATTERN = r"^(data:image/[A-Za-z0-9.+-]+;base64,|file://|https?://)"
