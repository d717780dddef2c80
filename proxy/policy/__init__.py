"""The policy: what a tenant's answers must clear, and what happens when they do not.

* :mod:`.schema`: the policy file's strict, frozen models (what a user writes);
* :mod:`.rules`: a validated file compiled into per-tenant, per-model rules, and
  :func:`~proxy.policy.rules.decide`, the answer/abstain decision;
* :mod:`.loading`: reading YAML files, key-path error messages, and reload.

Pure: nothing here imports a web or HTTP library.
"""
