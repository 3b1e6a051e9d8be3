"""The web console at /console on the admin listener: server-rendered pages (Jinja2), forms
first (POST-redirect-GET, every page works without JavaScript), inline SVG charts.

core.py is the framework every page module uses (sessions, roles, CSRF, render, errors, i18n);
app.py mounts the modules' ROUTES on the admin app; signin_pages.py signs in and out and
switches the language; operator_pages.py (overview, tenants, keys), usage_pages.py,
billing_pages.py, ops_pages.py (operators) and tenant_pages.py (/console/my/...) are the
pages; charts.py draws the SVG; passwords.py hashes passwords (scrypt).
"""
