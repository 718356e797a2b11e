-- The purpose of use the requester's token stated (HL7 PurposeOfUse: TREAT, ETREAT, ...), as
-- NEN 7513 asks; NULL on records from before it was kept. Adding a column changes no record.
ALTER TABLE access_log ADD COLUMN purpose_of_use text;
