-- Orthanc routing rule for the CT-FM DICOM node: every study, once stable (no new instance for Orthanc's
-- StableAge seconds), is sent to the node, series by series, except the results the node sends back (SEG, SR).
-- Install: put this file's path in Orthanc's configuration, "LuaScripts": ["/etc/orthanc/ctfm-route.lua"], and
-- declare the node as a modality, "DicomModalities": {"ctfmnode": ["CTFM", "node.example.org", 11112]}.
-- When the results arrive the study turns stable again and its images are sent once more: the node answers
-- success for instances it holds already and makes no new job, so nothing is processed twice.
--
-- The send is a job of Orthanc's REST API (POST /modalities/ctfmnode/store, asynchronous, listed in /jobs):
-- Lua's own SendToModality fails in Orthanc 1.10.1 (Debian 12) with "Unable to read attachment dicom of
-- instance ..." before it connects.

NODE_MODALITY = 'ctfmnode'

function OnStableStudy(studyId, tags, metadata)
  for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local modality = series['MainDicomTags']['Modality']
    if modality ~= 'SEG' and modality ~= 'SR' then
      RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
                  DumpJson({Resources = {series['ID']}, Synchronous = false}, true))
    end
  end
end
