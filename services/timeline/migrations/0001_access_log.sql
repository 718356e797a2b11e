-- NEN 7513 access log: one row per access attempt, kept at least five years, append-only.
CREATE TABLE access_log (
    event_id             uuid        PRIMARY KEY,
    occurred_at          timestamptz NOT NULL,
    event_type           text        NOT NULL,
    action               text        NOT NULL,
    outcome              text        NOT NULL CHECK (outcome IN ('allowed', 'denied', 'emergency')),
    patient_pseudonym    text,
    user_uzi             text,
    user_role            text,
    on_behalf_of_uzi     text,
    organisation_ura     text        NOT NULL,
    access_point         text        NOT NULL,
    authorisation_basis  text,
    consent_profile      text,
    emergency            boolean     NOT NULL DEFAULT false,
    reason               text,
    study_instance_uids  text[]      NOT NULL DEFAULT '{}'
);

CREATE INDEX access_log_patient_time ON access_log (patient_pseudonym, occurred_at DESC);

-- Audit records are evidence: nobody, not even the service's own role, may change or remove one.
CREATE FUNCTION access_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'access_log is append-only (% refused)', TG_OP;
END;
$$;

CREATE TRIGGER access_log_append_only
    BEFORE UPDATE OR DELETE ON access_log
    FOR EACH ROW EXECUTE FUNCTION access_log_is_append_only();

CREATE TRIGGER access_log_no_truncate
    BEFORE TRUNCATE ON access_log
    FOR EACH STATEMENT EXECUTE FUNCTION access_log_is_append_only();
