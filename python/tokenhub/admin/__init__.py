"""The admin API, `/admin/v1`, on a listener of its own ([admin] listen, 127.0.0.1:8081 by
default; worker 1 or the single process serves it).

- app.py: the app factory (`build_admin_app`), the error and auth middlewares, the listener;
- routes.py: the route table (method, path, scope, handler) and the thin handlers;
- web.py: what every handler shares: JSON in and out, money as decimal strings with a
  currency, opaque cursors, Idempotency-Key.

Every handler runs the same service functions as the CLI (tokenhub.store.sql's `*_in` functions
over one `db.Tx`, tokenhub.billing), in one transaction with its admin audit entry and, for a
money-moving POST, its Idempotency-Key record: a write is audited and remembered exactly when
it happened. docs/openapi.json describes the routes (tests/admin checks they are the same set).
"""
