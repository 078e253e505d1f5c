-- A restock is bounded by its order (issue 20): a return puts back at most what its order
-- reserved and has not had back yet, per SKU, counting the order's other standing restocks and
-- what the order's compensation released.
--
-- `restocks.order_id`: the order the return came from. NULL for restocks made before this
-- migration (their commands named no order); they count towards no order's returns.
ALTER TABLE restocks ADD COLUMN order_id uuid REFERENCES reservations (order_id);
CREATE INDEX restocks_order ON restocks (order_id) WHERE order_id IS NOT NULL;

-- `reservation_lines.released`: how much of the line the order's compensation gave back to
-- stock: the quantity less what returns of the order had restocked by then (those are back
-- already), and later what a restock undone after the release leaves in stock. While the
-- reservation is held it is 0; once released, quantity = released + what the order's returns
-- hold restocked, so the order keeps nothing.
ALTER TABLE reservation_lines
    ADD COLUMN released integer NOT NULL DEFAULT 0
        CHECK (released >= 0 AND released <= quantity);
-- Reservations released before this migration gave back their whole quantity.
UPDATE reservation_lines l SET released = l.quantity
    FROM reservations r WHERE r.order_id = l.order_id AND r.status = 'released';
