"""Phase 2: the cache served by AWS Lambda behind API Gateway, from DynamoDB.

Nothing here may import the web stack: the handler's cold start is measured against boto3's.
"""
