-- `parked`: a saga whose row could not be read was set aside as failed (with the reason).
ALTER TABLE saga_history DROP CONSTRAINT saga_history_decision_check;
ALTER TABLE saga_history ADD CONSTRAINT saga_history_decision_check
    CHECK (decision IN ('started', 'applied', 'ignored', 'deadline', 'operator', 'parked'));
