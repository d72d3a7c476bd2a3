"""The callback instance a LiteLLM proxy config names:

    litellm_settings:
      callbacks: services.client.litellm_proxy.proxy_handler

Built from the environment at import (no connection is made until the first call):
TOKENLEDGER_TARGET (default 127.0.0.1:50051), TOKENLEDGER_API_KEY, TOKENLEDGER_TENANT_ID,
TOKENLEDGER_DEFAULT_USER_ID, TOKENLEDGER_FAIL_OPEN=true to let calls through while the
ledger is away. Set LITELLM_LOCAL_MODEL_COST_MAP=True for the proxy as well.
"""

from services.client.litellm import LedgerCallback

proxy_handler = LedgerCallback.from_env()
