"""The original's "Production Pattern" as a package (reference document 000, lines
239-273): `app.py` is the original's code with only import lines added, `models.py` and
`workflows.py` are the two modules it imports. Serve it with
`nexus serve examples/production/app.py` (docs/server.md, "The Production Pattern").
"""
