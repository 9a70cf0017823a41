"""The control room's side of the dispatch link: wire protocol, dispatcher, CURVE keys."""
