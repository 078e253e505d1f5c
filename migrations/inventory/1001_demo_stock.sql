-- Demo data (documented in the README): plenty of WIDGET and GADGET, one LIMITED, no SOLDOUT.
INSERT INTO stock (sku, available) VALUES
    ('WIDGET', 1000000),
    ('GADGET', 1000000),
    ('LIMITED', 1),
    ('SOLDOUT', 0);
