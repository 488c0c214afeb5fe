"""One module per Nexmark query; see ``nexmark.query`` for what each module defines."""
