-- The timeline read model: a projection of study-received, consent-checked (purpose timeline),
-- consent-revoked and delivered, written only by services/timeline/adapters/store.py.
--
-- Every row is a deterministic function of the events, whatever order they are applied in (each
-- column group keeps the maximum of a total order, see store.py): no projection timestamps, so a
-- replay changes nothing and a rebuild from the topics yields identical tables.
-- Collation "C" wherever rows are ordered or compared: the same order as Python's str compare.

-- Per (study, sending institution): the study as that source holds it, at its latest snapshot,
-- and the latest timeline decision consent took for it.
CREATE TABLE timeline_sources (
    study_instance_uid          text COLLATE "C" NOT NULL,
    sender_ura                  text COLLATE "C" NOT NULL,
    -- The snapshot: the greatest (version, last_received_at, recipient_ura) seen in a
    -- study-received or consent-checked (both carry it; an assembly per recipient).
    version                     integer          NOT NULL,
    last_received_at            timestamptz      NOT NULL,
    recipient_ura               text COLLATE "C" NOT NULL,
    first_received_at           timestamptz      NOT NULL,
    patient_pseudonym           text COLLATE "C",
    accession_number            text,
    study_date                  date,
    study_time                  text COLLATE "C",
    study_description           text,
    institution_name            text,
    modalities                  text[]           NOT NULL,
    number_of_series            integer          NOT NULL,
    number_of_instances         integer          NOT NULL,
    -- Instances that are not reports (SR, encapsulated PDF).
    number_of_images            integer          NOT NULL,
    -- The decision: the greatest (snapshot key, deny first, decided_by) of the timeline
    -- consent-checked events of this source. NULL until one arrived.
    decision_version            integer,
    decision_last_received_at   timestamptz,
    decision_recipient_ura      text COLLATE "C",
    permitted                   boolean,
    basis                       text,
    decided_by                  text COLLATE "C",
    decision_patient            text COLLATE "C",
    -- A permit whose consent (decision_patient, decided_by) was revoked.
    withdrawn                   boolean          NOT NULL DEFAULT false,
    -- On the timeline: a permit, not withdrawn, taken for exactly the snapshot shown.
    visible                     boolean GENERATED ALWAYS AS (
        COALESCE(
            permitted
            AND NOT withdrawn
            AND patient_pseudonym IS NOT NULL
            AND decision_patient = patient_pseudonym
            AND decision_version = version
            AND decision_last_received_at = last_received_at
            AND decision_recipient_ura = recipient_ura,
            false
        )
    ) STORED,
    PRIMARY KEY (study_instance_uid, sender_ura)
);

-- A revocation finds the permits it withdraws.
CREATE INDEX timeline_sources_consent ON timeline_sources (decision_patient, decided_by)
    WHERE permitted;

-- The children of a source's current snapshot (replaced whenever the snapshot advances).
CREATE TABLE timeline_series (
    study_instance_uid   text COLLATE "C" NOT NULL,
    sender_ura           text COLLATE "C" NOT NULL,
    series_instance_uid  text COLLATE "C" NOT NULL,
    modality             text,
    series_number        integer,
    series_description   text,
    number_of_instances  integer          NOT NULL,
    PRIMARY KEY (study_instance_uid, sender_ura, series_instance_uid)
);

-- Claim checks for WADO: where each instance's exact received bytes are.
CREATE TABLE timeline_instances (
    study_instance_uid   text COLLATE "C" NOT NULL,
    sender_ura           text COLLATE "C" NOT NULL,
    sop_instance_uid     text COLLATE "C" NOT NULL,
    series_instance_uid  text COLLATE "C" NOT NULL,
    sop_class_uid        text             NOT NULL,
    transfer_syntax_uid  text             NOT NULL,
    object_key           text             NOT NULL,
    size                 bigint           NOT NULL,
    sha256               text             NOT NULL,
    PRIMARY KEY (study_instance_uid, sender_ura, sop_instance_uid)
);

-- Report instances (DICOM SR, encapsulated PDF): each its own timeline entry.
CREATE TABLE timeline_reports (
    study_instance_uid   text COLLATE "C" NOT NULL,
    sender_ura           text COLLATE "C" NOT NULL,
    sop_instance_uid     text COLLATE "C" NOT NULL,
    series_instance_uid  text COLLATE "C" NOT NULL,
    kind                 text             NOT NULL,
    PRIMARY KEY (study_instance_uid, sender_ura, sop_instance_uid)
);

-- Where else a study is retrievable: organisations it was delivered to (any version).
CREATE TABLE timeline_deliveries (
    study_instance_uid   text COLLATE "C" NOT NULL,
    destination_ura      text COLLATE "C" NOT NULL,
    endpoint_id          text COLLATE "C" NOT NULL,
    study_version        integer          NOT NULL,
    delivered_at         timestamptz      NOT NULL,
    PRIMARY KEY (study_instance_uid, destination_ura, endpoint_id)
);

-- Revoked consents. Revocation is final for a consent id (services/consent/domain/registry.py):
-- a permit that names one is withdrawn whenever it is applied, before or after the revocation.
CREATE TABLE timeline_revocations (
    patient_pseudonym    text COLLATE "C" NOT NULL,
    consent_id           text COLLATE "C" NOT NULL,
    revoked_at           timestamptz      NOT NULL,
    PRIMARY KEY (patient_pseudonym, consent_id)
);

-- Per Study Instance UID: the study as the timeline shows it, derived from its sources in the
-- same transaction. Attributes come from its primary source (visible first, then the first
-- received, then the lowest URA); listed sources are the visible ones of the same patient.
CREATE TABLE timeline_studies (
    study_instance_uid   text COLLATE "C" PRIMARY KEY,
    patient_pseudonym    text COLLATE "C",
    accession_number     text,
    study_date           date,
    study_time           text COLLATE "C",
    study_description    text,
    -- Every listed source's modalities, sorted.
    modalities           text[]           NOT NULL,
    -- The latest received_at of a listed source: "then received" in the timeline's order.
    received_at          timestamptz      NOT NULL,
    -- A listed source holds an instance that is not a report (else: report entries only).
    has_images           boolean          NOT NULL,
    visible              boolean          NOT NULL
);

-- The timeline itself, one row per entry of a visible study, everything the search returns
-- precomputed (derived from the tables above in the same transaction), so a search is one
-- index range scan: the images entry of each visible study (``searchable`` false when it holds
-- reports only: it is still the study's QIDO entry) and one entry per report instance.
CREATE TABLE timeline_entries (
    study_instance_uid       text COLLATE "C" NOT NULL,
    kind                     text COLLATE "C" NOT NULL CHECK (kind IN ('images', 'report')),
    -- '' for the images entry.
    report_sop_instance_uid  text COLLATE "C" NOT NULL,
    report_kind              text,
    searchable               boolean          NOT NULL,
    patient_pseudonym        text COLLATE "C" NOT NULL,
    accession_number         text,
    study_date               date,
    study_time               text COLLATE "C",
    study_description        text,
    modalities               text[]           NOT NULL,
    received_at              timestamptz      NOT NULL,
    -- The listed sources holding the entry, first received first (parallel arrays).
    source_uras              text[]           NOT NULL,
    source_names             text[]           NOT NULL,
    source_versions          integer[]        NOT NULL,
    source_received_at       timestamptz[]    NOT NULL,
    source_series            integer[]        NOT NULL,
    source_instances         integer[]        NOT NULL,
    -- The institution filter: the sources' URAs and lower-cased names.
    institution_keys         text[]           NOT NULL,
    delivered_to             text[]           NOT NULL,
    PRIMARY KEY (study_instance_uid, kind, report_sop_instance_uid)
);

-- The timeline search: one patient's entries, newest first, in the order they are returned.
CREATE INDEX timeline_entries_search ON timeline_entries (
    patient_pseudonym, study_date DESC NULLS LAST, study_time DESC NULLS LAST,
    received_at DESC, study_instance_uid, kind, report_sop_instance_uid
) WHERE searchable;
