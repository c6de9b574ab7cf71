-- boneflow auto-forwarding for Orthanc: every CR/DX radiograph stored in Orthanc is sent
-- to the "boneflow" modality (see DicomModalities). boneflow's own results (SR, Secondary
-- Capture) are never forwarded back, so nothing loops: only CR/DX SOP classes are
-- forwarded, and nothing that boneflow itself stored. Keep BONEFLOW_AE equal to the
-- AE title of the "boneflow" modality.
local BONEFLOW_AE = 'BONEFLOW'
local FORWARDED = {
  ['1.2.840.10008.5.1.4.1.1.1'] = true,      -- Computed Radiography Image Storage
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,    -- Digital X-Ray Image Storage - For Presentation
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = true,  -- Digital X-Ray Image Storage - For Processing
}

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RemoteAet'] == BONEFLOW_AE then
    return
  end
  local modality = tags['Modality']
  if (modality == 'CR' or modality == 'DX') and FORWARDED[tags['SOPClassUID']] then
    SendToModality(instanceId, 'boneflow')
  end
end
