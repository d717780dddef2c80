"""Extra sampled answers, for the methods that judge by agreement (consistency, hybrid).

* :mod:`.draw`: draws samples from an upstream in rounds, stopping once settled;
* :mod:`.session`: runs that draw alongside a request's main answer and hands the
  samples to the judge.
"""
