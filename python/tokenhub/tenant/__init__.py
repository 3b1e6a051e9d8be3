"""The tenant's own API on the gateway's listener (`/v1/tokenhub/...` and OpenAI's legacy
`/v1/dashboard/billing/...`), authenticated by the tenant's API key: tokenhub.tenant.routes."""
