"""API schemas, one module per resource (create / public / list), bounded; never storage rows. Every
request body is a ``base.Request`` and every name a ``base.Name``."""
