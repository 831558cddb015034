"""The study across real sites on Flower: the simulation's functions, run where the data is.

* :mod:`~fedblood.deploy.client_app` / :mod:`~fedblood.deploy.site`: a site's ClientApp;
* :mod:`~fedblood.deploy.server_app` / :mod:`~fedblood.deploy.server`: the ServerApp's loop;
* :mod:`~fedblood.deploy.study`: what both ends derive from the config;
* :mod:`~fedblood.deploy.wire`: trees as named arrays, checked on arrival, never pickled;
* :mod:`~fedblood.deploy.local`: a loopback federation of real processes (tests, bench).

Needs the ``flower`` extra (``pip install -e '.[flower]'``); see the README, "Run across
hospitals".
"""
