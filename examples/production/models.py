"""The production app's models, declared as plain annotated classes: the DataFlow they
belong to is made inside `create_production_app()`, so `register_workflows(app, db)`
makes them models of that `db` (`db.model(Contact)`), before any workflow uses them.
"""


class Contact:
    id: str
    name: str
    email: str
    company: str


class Company:
    id: str
    name: str
    industry: str
